from sheep.main import main

main()
