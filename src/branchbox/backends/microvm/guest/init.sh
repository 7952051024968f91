#!/bin/busybox sh
# branchbox microVM init (PID 1 in the initrd): load the virtio modules, mount the root disk, put the agent in
# /.branchbox (tmpfs), the agent's read-only runtime disk (bb.rt) at /.branchbox/rt, and switch_root to the shim,
# which starts the agent. No init system.
B=/bin/busybox
fail() { echo "branchbox-init: $*" > /dev/console; $B reboot -f; }
$B mount -t devtmpfs -o nosuid,mode=0755 dev /dev
$B mount -t proc -o nosuid,nodev,noexec proc /proc
$B mount -t sysfs -o nosuid,nodev,noexec sys /sys
case " $($B cat /proc/cmdline) " in *" bb.probe "*) echo branchbox-probe-ok > /dev/console; $B reboot -f ;; esac
while read -r m; do $B insmod "/modules/$m.ko" || fail "insmod $m failed"; done < /modules/order
hostname=branchbox
vsock=
rt=
for arg in $($B cat /proc/cmdline); do
  case "$arg" in
    bb.hostname=*) hostname="${arg#bb.hostname=}" ;;
    bb.vsock=*) vsock="${arg#bb.vsock=}" ;;  # the agent listens on this vsock port (host with vhost-vsock)
    bb.rt) rt=1 ;;  # disks by serial: bbroot (the root) and bbrt (the agent's runtime)
  esac
done
root=/dev/vda
rtdev=
i=0
while :; do
  if [ -n "$rt" ]; then
    root=
    for d in /sys/block/vd*; do
      case "$($B cat "$d/serial" 2>/dev/null)" in
        bbroot) root="/dev/${d##*/}" ;;
        bbrt) rtdev="/dev/${d##*/}" ;;
      esac
    done
    [ -n "$root" ] && [ -n "$rtdev" ] && [ -b "$root" ] && [ -b "$rtdev" ] && break
  elif [ -b "$root" ]; then
    break
  fi
  i=$((i + 1)); [ "$i" -gt 2000 ] && fail "no root disk${rt:+ or runtime disk}"; $B usleep 1000
done
$B mount -t ext4 -o noatime "$root" /newroot || fail "cannot mount $root"
port=
i=0
while [ -z "$vsock" ] && [ -z "$port" ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$($B cat "$p/name" 2>/dev/null)" = agent ] && port="/dev/${p##*/}"
  done
  if [ -z "$port" ]; then i=$((i + 1)); [ "$i" -gt 2000 ] && fail "no virtio-serial port 'agent'"; $B usleep 1000; fi
done
$B mkdir -p /newroot/.branchbox /newroot/dev /newroot/proc /newroot/sys /newroot/tmp
$B mount -t tmpfs -o mode=0755,size=16m,nosuid,nodev branchbox /newroot/.branchbox
if [ -n "$rtdev" ]; then
  $B mkdir /newroot/.branchbox/rt
  $B mount -t ext4 -o ro,noatime,nodev "$rtdev" /newroot/.branchbox/rt || fail "cannot mount the runtime $rtdev"
fi
$B cp -r /bbagent /newroot/.branchbox/bbagent
$B cp /bin/busybox /shim /newroot/.branchbox/
$B hostname "$hostname"
$B mount --move /dev /newroot/dev
$B mount --move /proc /newroot/proc
$B mount --move /sys /newroot/sys
$B mkdir -p /newroot/dev/pts /newroot/dev/shm
$B mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts
$B mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm
$B mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /newroot/tmp
if [ -n "$vsock" ]; then export BRANCHBOX_VSOCK_PORT="$vsock"; else export BRANCHBOX_CHARDEV="$port"; fi
exec $B switch_root /newroot /.branchbox/busybox sh /.branchbox/shim
