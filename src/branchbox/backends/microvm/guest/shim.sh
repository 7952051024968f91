# branchbox microVM shim (PID 1 on the root disk): start the agent with the template's python3.
cd /
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[ -e /dev/ptmx ] || /.branchbox/busybox ln -sf pts/ptmx /dev/ptmx
entry=server  # the agent on the virtio-serial port; bbagent.vsock: on a vsock port
[ -n "$BRANCHBOX_VSOCK_PORT" ] && entry=vsock
for py in /usr/local/bin/python3 /usr/bin/python3; do
  [ -x "$py" ] && exec "$py" -I -S -B -c \
    "import sys;sys.path[:0]=['/.branchbox'];from bbagent.$entry import main;main()"
done
echo "branchbox-shim: the template has no python3" > /dev/console
exec /.branchbox/busybox reboot -f
