from dog.main import main

main()
