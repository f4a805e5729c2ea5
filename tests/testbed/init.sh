#!/bin/busybox sh
# PID 1 of the test bed's level-1 VM. Loads KVM and virtiofs, shows the host's root
# read-only at /newroot with the job's shares at their own paths, runs the job
# there, records its exit status and powers off. The job directory (on the kernel command
# line as testbed.job=DIR) holds job.sh, shares, and receives stdout, stderr and status.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() { echo "testbed-l1: $*" >&2; poweroff -f; }
# Progress lines on the console, which the host keeps as the job's console.log: they tell
# a hung level-1 boot from a hung job.
say() { echo "testbed-l1: $*" > /dev/console; }

for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || fail "cannot load module $m"
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd (is SVM emulated? use -cpu max)"

job=$(sed -n 's/.*testbed\.job=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$job" ] || fail "no testbed.job= on the command line"
mount -t virtiofs host /mnt/host || fail "cannot mount the host's root over virtiofs"
[ -f "/mnt/host$job/job.sh" ] || fail "no job script at $job/job.sh"

mount --bind /mnt/host /newroot
mount -o remount,bind,ro /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
for d in tmp run var/tmp; do mount -t tmpfs tmpfs "/newroot/$d"; done
# Shares, parents first: "ro PATH" or "rw PATH". Read-only ones bring back host paths the
# tmpfs mounts above hide (a checkout under /tmp); writable ones are the job's directories.
while read -r mode share; do
    [ -n "$share" ] || continue
    mkdir -p "/newroot$share" 2>/dev/null
    mount --bind "/mnt/host$share" "/newroot$share" || fail "cannot share $share"
    if [ "$mode" = ro ]; then
        mount -o remount,bind,ro "/newroot$share" || fail "cannot make $share read-only"
    fi
done < "/mnt/host$job/shares"

# A CPU stuck in the level-1 kernel (a soft lockup; seen in CI under heavy nested virtio
# traffic, a fault of the emulation or of the level-1 kernel) panics the level-1 VM at once
# rather than hanging the job until its time limit: the host sees the level-1 VM die. The
# console shows warnings from here on (level 4 and the backtraces printed with them).
echo 1 > /proc/sys/kernel/softlockup_panic
echo 5 > /proc/sys/kernel/printk
# One empty KVM VM (no vCPU, no memory) stays open for the whole job. KVM turns SVM on in
# every CPU when the first VM of the machine is created and off again when the last one
# goes; under QEMU's TCG, a few hundred such on/off rounds freeze the level-1 VM as a whole
# (reproduced with nothing but KVM_CREATE_VM and close in a loop: frozen after 300 to 400
# rounds, twice; with this VM held, 3000 rounds ran through). Held, SVM stays on and VMMs
# that start and stop back to back (churn) never toggle it. Hardware hosts have no such
# fault. The holder is perl from the host's root (perl-base is essential in Debian).
chroot /newroot /usr/bin/perl -e '
    open(my $kvm, "+<", "/dev/kvm") or die "testbed-l1: cannot open /dev/kvm: $!\n";
    defined(ioctl($kvm, 0xAE01, 0)) or die "testbed-l1: KVM_CREATE_VM failed: $!\n";
    open(my $mark, ">", "/run/testbed-kvm-held") or die "testbed-l1: cannot mark: $!\n";
    close($mark);
    sleep;' > /dev/console 2>&1 &
n=0
until [ -e /newroot/run/testbed-kvm-held ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
if [ -e /newroot/run/testbed-kvm-held ]; then
    say "holding an empty KVM VM for the job"
else
    say "WARNING: no empty KVM VM held (see above); long runs of VMs may freeze this VM"
fi
say "running $job/job.sh"
# A heartbeat while the job runs: uptime and load show whether level 1 still makes progress.
( while sleep 60; do say "alive: $(cat /proc/uptime /proc/loadavg | tr '\n' ' ')"; done ) &
chroot /newroot /usr/bin/env -i HOME=/root TERM=dumb EMBER_TESTBED_LEVEL=1 \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash "$job/job.sh" > "/mnt/host$job/stdout" 2> "/mnt/host$job/stderr"
rc=$?
say "job exited with status $rc"
echo $rc > "/mnt/host$job/status"
sync
poweroff -f
