#!/bin/sh
# /init of the guestnet test VM (a template: @MODULES@ is filled in by initramfs.py).
#
# Theory of operation: the kernel runs this as PID 1 from the initramfs. It mounts the pseudo
# filesystems, loads the virtio-net driver stack, brings lo and eth0 up (no address), and then
# sources /guest/script.sh, the per-test steps appended to the initramfs as a second cpio archive.
# The script runs in this shell, so it can call the helpers below. Whatever happens, the guest
# powers off at the end, which makes QEMU (-no-reboot) exit.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

# section NAME CMD [ARGS...]: run CMD with its output (stdout and stderr) between markers on the
# console, so the test can pick it out from kernel messages. The exit status goes in the end marker.
section() {
    _name="$1"
    shift
    echo "@@GUESTNET-BEGIN $_name@@"
    "$@" 2>&1
    _rc=$?
    echo "@@GUESTNET-END $_name rc=$_rc@@"
    return $_rc
}

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "@@GUESTNET-MODULE-FAILED $m@@"
done
ip link set lo up
ip link set eth0 up || echo "@@GUESTNET-NO-ETH0@@"
echo "@@GUESTNET-READY@@"

if [ -f /guest/script.sh ]; then
    . /guest/script.sh
    echo "@@GUESTNET-SCRIPT-EXIT rc=$?@@"
else
    echo "@@GUESTNET-NO-SCRIPT@@"
fi
sync
poweroff -f
