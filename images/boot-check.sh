#!/bin/bash
# Boot-check a built image: QEMU (TCG) with one virtio NIC on a tap inside a throwaway
# network namespace, with dnsmasq answering DHCP there (198.18.0.0/24, the MAC gets .10), and
# netboot.report=1 so the image prints its boot report on the console; stops the VM once the
# report is out (or after 600 s). Root only; nothing touches the host's interfaces.
# Usage: images/boot-check.sh dom0|storage MAC LOGFILE   (docs/images.md)
set -eu -o pipefail
if [ $# -ne 3 ] || { [ "$1" != dom0 ] && [ "$1" != storage ]; }; then
    echo "usage: $0 dom0|storage MAC LOGFILE" >&2
    exit 2
fi
role=$1 mac=$2
log=$(realpath -m "$3")
ns=nbimg-$role-$$
work=$(mktemp -d)
cleanup() {
    if [ -f "$work/dnsmasq.pid" ]; then
        kill "$(cat "$work/dnsmasq.pid")" 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add dev tap0 mode tap
ip -n "$ns" addr add 198.18.0.1/24 dev tap0
ip -n "$ns" link set tap0 up
ip netns exec "$ns" dnsmasq --keep-in-foreground --port=0 --interface=tap0 --bind-interfaces \
    --dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0 --dhcp-host="$mac,198.18.0.10" \
    --dhcp-leasefile="$work/leases" --pid-file="$work/dnsmasq.pid" --log-dhcp \
    > "$work/dnsmasq.log" 2>&1 &
args="netboot.server=http://198.18.0.1:8080 netboot.mac=$mac netboot.role=$role netboot.report=1"
cd "$(dirname "$0")/.."
if [ "$role" = dom0 ]; then
    ip netns exec "$ns" timeout 600 qemu-system-x86_64 -cpu qemu64,+svm -smp 2 -m 3072 \
        -nographic -no-reboot -nic tap,ifname=tap0,script=no,downscript=no,model=virtio-net-pci,mac="$mac" \
        -kernel build/images/dom0/xen \
        -initrd "build/images/dom0/vmlinuz console=hvc0 $args netboot.hostname=hn1,build/images/dom0/initramfs.img" \
        -append 'dom0_mem=1024M,max:1024M dom0_max_vcpus=1 console=com1 com1=115200,8n1' \
        > "$log" 2>&1 < /dev/null &
else
    truncate -s 1G "$work/disk.img"
    ip netns exec "$ns" timeout 600 qemu-system-x86_64 -smp 2 -m 2048 \
        -nographic -no-reboot -nic tap,ifname=tap0,script=no,downscript=no,model=virtio-net-pci,mac="$mac" \
        -drive file="$work/disk.img",format=raw,if=virtio \
        -kernel build/images/storage/vmlinuz -initrd build/images/storage/initramfs.img \
        -append "console=ttyS0,115200 $args netboot.hostname=sn1" \
        > "$log" 2>&1 < /dev/null &
fi
qemu_pid=$!
started=$(date +%s)
while kill -0 "$qemu_pid" 2>/dev/null; do
    if grep -aq NETBOOT-REPORT-END "$log"; then
        sleep 2
        kill "$qemu_pid"
        break
    fi
    sleep 5
done
wait "$qemu_pid" || true
echo "$role: report after $(( $(date +%s) - started ))s"
cp "$work/dnsmasq.log" "$log.dnsmasq"
