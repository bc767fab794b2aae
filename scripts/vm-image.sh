#!/usr/bin/env bash
# Builds the virtual machine that tests/tests/process/vm.rs boots to run Tidal under a real systemd
# with cgroup v2 (these development machines keep the cpu controller on cgroup v1):
#   .tidal/vm/rootfs      Debian bookworm (debootstrap, minbase) with systemd as PID 1
#   .tidal/vm/vmlinuz     Debian's linux-image-amd64 kernel, and its initramfs (virtio, ext4)
#   .tidal/vm/initrd.img
# Installs qemu-system-x86, debootstrap and e2fsprogs from Debian's packages when missing
# (needs root and apt). Idempotent: does nothing once .tidal/vm/ready exists. About 80 s and
# 200 MB of packages on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

VM=.tidal/vm
SUITE=bookworm
MIRROR=${TIDAL_DEBIAN_MIRROR:-http://deb.debian.org/debian}

# Bump when the image's contents change: an older image is rebuilt.
IMAGE_VERSION=2
[ "$(cat "$VM/ready" 2>/dev/null)" = "$IMAGE_VERSION" ] && exit 0

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "vm-image: ${need[*]} missing and cannot be installed here (needs root and apt-get)" >&2
    exit 2
  fi
  echo "vm-image: installing ${need[*]} (Debian packages)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
  echo "vm-image: debootstrap needs root" >&2
  exit 2
fi

rm -rf "$VM/rootfs.tmp" "$VM/rootfs" "$VM/ready"
mkdir -p "$VM"
echo "vm-image: debootstrap $SUITE with systemd and linux-image-amd64 into $VM (about 80 s)"
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,udev,linux-image-amd64,initramfs-tools,procps,iproute2,openssh-server,python3,sudo \
  "$SUITE" "$VM/rootfs.tmp" "$MIRROR" >"$VM/debootstrap.log" 2>&1 \
  || { tail -20 "$VM/debootstrap.log" >&2; exit 1; }

root=$VM/rootfs.tmp
cp "$root"/boot/vmlinuz-* "$VM/vmlinuz"
cp "$root"/boot/initrd.img-* "$VM/initrd.img"
# What the guest does not need: documentation, locales, the kernel images (booted from outside).
rm -rf "$root"/usr/share/{doc,man,info,locale} "$root"/boot/* "$root"/var/cache/apt/archives/*.deb
echo tidal-vm >"$root/etc/hostname"
echo "/dev/vda / ext4 rw,relatime 0 1" >"$root/etc/fstab"
# The daemons' user; no login, no home.
chroot "$root" useradd --system --user-group --no-create-home --shell /usr/sbin/nologin tidal
# A quiet, fast boot: no getty on the console the test reads, no timers.
chroot "$root" systemctl mask serial-getty@ttyS0.service getty@tty1.service \
  apt-daily.timer apt-daily-upgrade.timer systemd-timesyncd.service e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
chroot "$root" systemctl set-default multi-user.target >/dev/null
# Networking for the multi-machine tests: the address comes from the kernel command line
# (tidal.ip=10.77.0.11/24), on the first ethernet interface; none without it.
cat >"$root/usr/local/sbin/tidal-net" <<'SH'
#!/bin/sh
ip=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^tidal\.ip=//p')
[ -n "$ip" ] || exit 0
for i in $(seq 50); do
  dev=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
  [ -n "$dev" ] && break
  sleep 0.2
done
ip link set lo up
ip link set "$dev" up
ip addr add "$ip" dev "$dev"
SH
chmod 755 "$root/usr/local/sbin/tidal-net"
cat >"$root/etc/systemd/system/tidal-net.service" <<'UNIT'
[Unit]
Description=Test network address from the kernel command line
Before=network-online.target ssh.service
Wants=network-online.target
After=systemd-udev-settle.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/tidal-net
[Install]
WantedBy=multi-user.target network-online.target
UNIT
chroot "$root" systemctl enable tidal-net.service >/dev/null 2>&1
mkdir -p "$root/root/.ssh" && chmod 700 "$root/root/.ssh"
mv "$root" "$VM/rootfs"
echo "$IMAGE_VERSION" >"$VM/ready"
echo "vm-image: ready in $VM"
