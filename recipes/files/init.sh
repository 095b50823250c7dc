#!/bin/sh
# castore guest init (PID 1) for a read-only squashfs root; busybox sh.
# Like Celestial's /sbin/ceinit: mount the ext4 disk named by the kernel
# parameter overlay_root=vdX at /overlay, stack overlayfs (lower = the read-only
# root, upper = /overlay/root, work = /overlay/work) on /mnt, pivot_root into
# it (old root ends up at /rom), run /app.sh, then sync and power off.
#   overlay_root unset -> run /app.sh on the read-only root, no overlay.
#   overlay_root=ram   -> tmpfs overlay (nothing persists).
# The kernel hands unknown key=value boot parameters to init as environment
# variables; it sets no PATH.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root

log() { echo "castore-init: $*"; }

poweroff_now() {
    sync
    if [ -n "$frozen" ]; then
        # ext4 under the overlay: read-only remount if possible, else freeze;
        # both flush the journal so the disk is consistent when the VM stops.
        mount -o remount,ro "$frozen" 2>/dev/null || fsfreeze --freeze "$frozen"
    fi
    # reboot=t (QEMU microvm) / reboot=k (Firecracker) + -no-reboot: the VM exits.
    reboot -f
    while :; do sleep 1; done   # PID 1 must never exit
}

grep -q ' /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc
grep -q ' /sys ' /proc/mounts || mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
[ -f /etc/hostname ] && hostname -F /etc/hostname

frozen=
if [ -z "$overlay_root" ]; then
    log "overlay_root not set: running /app.sh on the read-only root, no overlay"
    mount -t tmpfs -o mode=1777 tmpfs /tmp
else
    if [ "$overlay_root" = ram ]; then
        mount -t tmpfs -o mode=0755 tmpfs /overlay || { log "FATAL: tmpfs overlay failed"; poweroff_now; }
    elif [ -b "/dev/$overlay_root" ]; then
        mount -t ext4 -o noatime "/dev/$overlay_root" /overlay ||
            { log "FATAL: cannot mount /dev/$overlay_root as ext4"; poweroff_now; }
        frozen=/rom/overlay
    else
        log "FATAL: overlay_root=$overlay_root but /dev/$overlay_root is not a block device"
        ls /dev
        poweroff_now
    fi
    mkdir -p /overlay/root /overlay/work
    mount -t overlay -o noatime,lowerdir=/,upperdir=/overlay/root,workdir=/overlay/work \
        "overlayfs:/overlay/root" /mnt || { log "FATAL: overlayfs mount failed"; poweroff_now; }
    # carry the API filesystems into the new root, then switch to it
    for d in dev proc sys; do mount --move "/$d" "/mnt/$d"; done
    pivot_root /mnt /mnt/rom || { log "FATAL: pivot_root failed"; poweroff_now; }
    cd /
    log "overlay_root=$overlay_root mounted, / is now overlayfs (read-only root at /rom)"
fi

if [ -f /app.sh ]; then
    /bin/sh /app.sh
    log "/app.sh exited with status $?"
else
    log "no /app.sh in the image"
fi
poweroff_now
