#!/bin/sh
# PID 1 baked into the test image: mount the basics and the checkout, then run the checkout's
# vm/guest.sh; always power off so qemu exits.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
modprobe -a 9pnet_virtio 9p
mkdir -p /project /results
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /results \
    && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro project /project; then
    sh /project/vm/guest.sh
else
    echo "polyrpc-vm: could not mount the 9p shares" >&2
fi
sync
echo o > /proc/sysrq-trigger
sleep 30
