# The demo's VM: a small Linux guest (scripts/guest) boots from a VDI over NBD,
# makes a file system and writes a file; the VDI is snapshotted while the guest
# still runs, the snapshot cloned, and a second guest boots from the clone and
# reads the file back. Sourced by scripts/demo and by tests/cli/test_demo_vm.py.
# Needs dog on PATH talking to a formatted cluster (DOG_PORT, DOG_KEYRING) and an
# NBD server of it on 127.0.0.1:NBDPORT (dog nbd serve).

# The accelerator: VM_ACCEL (kvm, tcg), else TCG. Not KVM by default: on machines
# where /dev/kvm opens and an empty machine starts, a real guest can still hang
# at its first instructions (seen here: KVM without the CPU features QEMU asks for),
# and no quick probe tells; TCG boots this guest in a few seconds anyway.
vm_accel() {
    echo "${VM_ACCEL:-tcg}"
}

# vm_boot GUEST NBDPORT VDI LOG KERNEL-ARGS...: boot the guest on nbd://.../VDI, its
# serial console into LOG, in the background; prints qemu's pid.
vm_boot() {
    local guest=$1 nbdport=$2 vdi=$3 log=$4
    shift 4
    qemu-system-x86_64 -accel "${VM_ACCEL:-tcg}" -m 256M -nographic -no-reboot \
        -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" \
        -append "console=ttyS0 quiet panic=-1 $*" \
        -drive "file=nbd://127.0.0.1:$nbdport/$vdi,format=raw,if=virtio,cache=none" \
        </dev/null >"$log" 2>&1 &
    echo $!
}

# vm_wait LOG PATTERN SECONDS: until the console shows PATTERN (0), or not in time (1).
vm_wait() {
    local log=$1 pattern=$2 seconds=$3 waited=0
    until grep -q "$pattern" "$log" 2>/dev/null; do
        [ "$waited" -ge $((seconds * 10)) ] && return 1
        sleep 0.1
        waited=$((waited + 1))
    done
}

# vm_demo WORK NBDPORT: the whole walk; 0 when the clone's guest read the file the
# first guest wrote, 2 when the guest's packages cannot be had, 1 otherwise (the
# consoles are in WORK/vm-*.log).
vm_demo() {
    local work=$1 nbdport=$2 marker pid
    VM_ACCEL=${VM_ACCEL:-$(vm_accel)}
    marker="written-in-a-vm-$RANDOM$RANDOM"
    echo "\$ scripts/guest $work/guest     (a Debian kernel and busybox, cached under it)"
    local built=0
    scripts/guest "$work/guest" || built=$?
    [ "$built" = 69 ] && return 2  # the packages cannot be had here: the caller says so
    [ "$built" = 0 ] || return 1
    echo "\$ dog vdi create vm 256M"
    dog vdi create vm 256M
    echo "\$ qemu-system-x86_64 -accel $VM_ACCEL -kernel ... -drive file=nbd://127.0.0.1:$nbdport/vm,format=raw,if=virtio"
    pid=$(vm_boot "$work/guest" "$nbdport" vm "$work/vm-write.log" \
        sheepdemo=write "sheepmarker=$marker" sheephold=30)
    if ! vm_wait "$work/vm-write.log" "sheepguest: wrote" 120; then
        kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
        echo "the guest did not write its file:"; tail -5 "$work/vm-write.log"
        return 1
    fi
    grep -o "sheepguest: wrote.*" "$work/vm-write.log" | head -1
    echo "(the guest still runs: snapshot the VDI under it, clone the snapshot)"
    echo "\$ dog vdi snapshot -s booted vm"
    dog vdi snapshot -s booted vm
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
    echo "\$ dog vdi clone -s booted vm vm-clone"
    dog vdi clone -s booted vm vm-clone
    echo "\$ qemu-system-x86_64 ... -drive file=nbd://127.0.0.1:$nbdport/vm-clone,..."
    pid=$(vm_boot "$work/guest" "$nbdport" vm-clone "$work/vm-read.log" sheepdemo=read)
    vm_wait "$work/vm-read.log" "sheepguest: powering off" 120 || true
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
    grep -o "sheepguest: read.*" "$work/vm-read.log" || true
    if grep -q "sheepguest: read $marker" "$work/vm-read.log"; then
        echo "the clone's guest sees the file the first guest wrote"
        return 0
    fi
    echo "the clone's guest did NOT see the file:"; tail -5 "$work/vm-read.log"
    return 1
}
