# branchbox microVM shim (PID 1 on the root disk): start the agent on branchbox's own runtime (the host's python3
# and the libraries it links, through the host's loader: see runtime.py), or, in a VM booted without one, on the
# template's python3.
cd /
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[ -e /dev/ptmx ] || /.branchbox/busybox ln -sf pts/ptmx /dev/ptmx
entry=server  # the agent on the virtio-serial port; bbagent.vsock: on a vsock port
[ -n "$BRANCHBOX_VSOCK_PORT" ] && entry=vsock
code="import sys;sys.path[:0]=['/.branchbox'];from bbagent.$entry import main;main()"
rt=/.branchbox/rt
[ -x $rt/bin/python3 ] && exec $rt/lib/ld-linux-x86-64.so.2 --library-path $rt/lib $rt/bin/python3 -I -S -B -c "$code"
for py in /usr/local/bin/python3 /usr/bin/python3; do
  [ -x "$py" ] && exec "$py" -I -S -B -c "$code"
done
echo "branchbox-shim: the template has no python3" > /dev/console
exec /.branchbox/busybox reboot -f
