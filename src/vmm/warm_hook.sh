#!/bin/sh
# Installed by nox (warm template). Started while the template's guest is
# saved, it watches the seed disk, which differs for every VM: a VM
# resumed from the saved state sees its own seed, and takes its identity
# from it. nox writes that identity as plain text at a fixed place of the
# seed (@SKIP@ sectors in, its first line unique to the VM): one dd with
# O_DIRECT (no stale cache) reads it, the shell's own `read` parses it.
#
# Under TCG every process the hook starts costs tens of milliseconds, so
# values are read and written with the shell's own `read` and `printf`
# (files, /proc, /sys; paths with `cd -P`), and what can overlap does.
# sshd gets this VM's host key first (it re-executes on SIGHUP, the
# longest step); the clock, the CRNG and the names beside it. Where this
# VM's MAC differs from the template's (a bridge: MACs must be unique
# there), the NIC is unbound from the start until it is this VM's own, so
# nothing reaches the guest half-made; on user networking the VM keeps
# the template's MAC (its only peer is its own passt) and its NIC. The
# last line, "identity applied", is written at error level so it reaches
# the serial console: nox's --wait waits for it before its first SSH
# attempt (a probe into a guest that does not answer yet costs passt a
# busy loop, and --wait a retry). Progress lines ("nox-warm: ...") go to
# the kernel log only.
set -u
step() { echo "nox-warm: $1" >/dev/kmsg; }
seed_dev() {
  for d in /dev/vd? /dev/sd?; do
    [ -b "$d" ] || continue
    label=$(dd if="$d" bs=512 count=1 iflag=direct 2>/dev/null | od -An -c -j43 -N6 | tr -d ' ')
    [ "$label" = cidata ] && { echo "$d"; return; }
  done
}
dev=$(seed_dev)
[ -n "$dev" ] || exit 0
umask 077
blk=/run/nox-warm.blk
# Reads $1 sectors of the block; sets $first, its first line. The poll
# reads the first sector only, which holds nothing secret: the source's
# own seed may be a warm VM's, and this file is in the RAM the template
# saves.
readblk() {
  dd if="$dev" of="$blk" bs=512 skip=@SKIP@ count="$1" iflag=direct 2>/dev/null
  first=''
  read -r first 2>/dev/null <"$blk" || :
}
readblk 1
mine=$first
# A resumed VM's first look sees its own seed: the interval only costs the
# template's source the seconds between this start and the save.
while [ "$first" = "$mine" ]; do
  sleep 0.05
  readblk 1
done
step "seed changed"
readblk @COUNT@
nl='
'
# parse-block: begin (a unit test runs this part on a seed nox wrote)
host='' user='' mac='' old_mac='' machine_id='' host_key='' host_key_pub='' keys='' entropy='' whole=''
# Takes a plain value (the same in the block and in nox-warm.env).
plain() {
  case "$1" in
  HOSTNAME=*) host=${1#*=} ;;
  USER=*) user=${1#*=} ;;
  MAC=*) mac=${1#*=} ;;
  OLD_MAC=*) old_mac=${1#*=} ;;
  MACHINE_ID=*) machine_id=${1#*=} ;;
  ENTROPY=*) entropy=${1#*=} ;;
  *) return 1 ;;
  esac
}
# The seed's other files follow the block: nothing after END is its.
case "$first" in
"nox-warm 3 "*)
  while IFS= read -r line; do
    plain "$line" && continue
    case "$line" in
    HOST_KEY=*) host_key=$host_key${line#*=}$nl ;;
    HOST_KEY_PUB=*) host_key_pub=${line#*=}$nl ;;
    AUTHORIZED_KEY=*) keys=$keys${line#*=}$nl ;;
    END)
      whole=1
      break
      ;;
    esac
  done <"$blk"
  ;;
esac
# parse-block: end
rm -f "$blk"
if [ -z "$whole" ]; then
  # No whole block (a seed of another nox, or keys too many for it): the
  # seed's nox-warm.env, mounted, base64 where not a plain token.
  seed=/run/nox-seed
  mkdir -p "$seed"
  blockdev --flushbufs "$dev" 2>/dev/null
  mount -o ro "$dev" "$seed" || exit 1
  env="$seed/nox-warm.env"
  if [ ! -f "$env" ]; then umount "$seed"; exit 0; fi
  while IFS= read -r line; do
    plain "$line" && continue
    case "$line" in
    HOST_KEY=*) host_key=$(printf '%s' "${line#*=}" | base64 -d)$nl ;;
    HOST_KEY_PUB=*) host_key_pub=$(printf '%s' "${line#*=}" | base64 -d)$nl ;;
    AUTHORIZED_KEYS=*) keys=$(printf '%s' "${line#*=}" | base64 -d)$nl ;;
    esac
  done <"$env"
  umount "$seed"
fi
[ -n "$host" ] && [ -n "$mac" ] && [ -n "$host_key" ] || exit 1
same_mac=''
[ "$mac" = "$old_mac" ] && same_mac=1
# A new MAC (a bridge). The NICs that still have the template's MAC
# leave at once: their driver is unbound (nothing reaches the guest before
# the NIC is this VM's), and bound again below once the network config
# names this VM's MAC. Binding resets the device, so qemu gives it this
# VM's MAC (its -device argument) and the kernel reads that as the
# permanent address too: netplan and NetworkManager match the permanent
# address, and a resumed device keeps the template's. Paths resolved with
# `cd -P`: no process.
rebind='' downs='' managed=''
if [ -z "$same_mac" ]; then
  for i in /sys/class/net/*; do
    read -r a 2>/dev/null <"$i/address" || continue
    [ "$a" = "$old_mac" ] || continue
    # networkd (its state file says so) or NetworkManager (its device file)
    # manages it: they bring the new NIC up themselves.
    if read -r x 2>/dev/null <"$i/ifindex"; then
      [ -e "/run/NetworkManager/devices/$x" ] && managed="$managed ${i##*/}"
      while IFS= read -r y; do
        [ "$y" = ADMIN_STATE=configured ] && managed="$managed ${i##*/}"
      done 2>/dev/null <"/run/systemd/netif/links/$x"
    fi
    if cd -P "$i/device" 2>/dev/null && d=$PWD && cd -P driver 2>/dev/null &&
      [ -w unbind ] && echo "${d##*/}" >unbind; then
      rebind="$rebind $PWD/${d##*/}"
      # The NIC a managed NIC's device comes back as.
      case " $managed " in *" ${i##*/} "*) managed="$managed ${d##*/}" ;; esac
    else
      # No re-probe: down until it has this VM's address (below).
      ip link set dev "${i##*/}" down
      downs="$downs ${i##*/}"
    fi
  done
  cd /
fi
# The CRNG: with qemu's vmgenid (amd64) the kernel reseeded before
# anything in the guest ran ("crng reseeded due to virtual machine fork");
# the seed's entropy is mixed in beside what follows. Without (arm64), VMs
# resumed from one state would share its CRNG until its next scheduled
# reseed: the seed's entropy is credited and the CRNG reseeded at once
# (RNDADDENTROPY, RNDRESEEDCRNG, made by perl, Essential in Debian),
# before sshd re-executes and anything reaches it.
vmgenid=''
for v in /sys/bus/*/drivers/vmgenid/*:*; do [ -e "$v" ] && vmgenid=1; done
if [ -n "$vmgenid" ]; then
  step "crng reseeded by vmgenid"
else
  printf '%s' "$entropy" | base64 -d | perl -e 'binmode STDIN; local $/; my $d = <STDIN>;
    open(my $f, "+<", "/dev/urandom") or die "$!";
    ioctl($f, 0x40085203, pack("ii", 8 * length($d), length($d)) . $d) or die "RNDADDENTROPY: $!";
    ioctl($f, 0x5207, 0) or die "RNDRESEEDCRNG: $!";' && step "crng reseeded"
fi
# The SSH host key, first: sshd re-executes on SIGHUP (a new listening
# socket), the longest step here, and runs beside the rest. The commit
# left only the throwaway ed25519 key, overwritten here.
for f in /etc/ssh/ssh_host_*; do
  case "$f" in
  */ssh_host_ed25519_key | */ssh_host_ed25519_key.pub) ;;
  *) [ -e "$f" ] && rm -f "$f" ;;
  esac
done
printf '%s' "$host_key" >/etc/ssh/ssh_host_ed25519_key
umask 022
printf '%s' "$host_key_pub" >/etc/ssh/ssh_host_ed25519_key.pub
# `listener` sets $l (the inode of sshd's listening socket) without a
# subshell.
listener() {
  l=''
  while read -r _ local _ st _ _ _ _ _ ino _; do
    [ "$st" = 0A ] && case "$local" in *:0016) l=$ino; return ;; esac
  done </proc/net/tcp
}
listener
before=$l
# sshd's own SIGHUP (what `systemctl reload` sends after `sshd -t`, two
# processes more), if the pid file names a running sshd; else systemd.
pid='' comm='' sock=''
read -r pid 2>/dev/null </run/sshd.pid
[ -n "$pid" ] && read -r comm 2>/dev/null </proc/"$pid"/comm
if [ "$comm" = sshd ] && kill -HUP "$pid" 2>/dev/null; then
  :
else
  systemctl reload ssh.service 2>/dev/null || systemctl reload sshd.service 2>/dev/null
  # Socket activation (ssh.socket): systemd keeps the listener, nothing
  # to wait for.
  systemctl is-active --quiet ssh.socket 2>/dev/null && sock=1
fi
# The rest beside it: the clock (the RTC follows the host; the resumed
# kernel's clock does not), the seed's entropy, the names.
(
  if read -r now 2>/dev/null </sys/class/rtc/rtc0/since_epoch; then
    date -s "@$now" >/dev/null
  fi
  [ -n "$vmgenid" ] && printf '%s' "$entropy" | base64 -d >/dev/urandom
) &
clock=$!
read -r old </proc/sys/kernel/hostname || old=''
echo "$host" >/etc/hostname
echo "$host" >/proc/sys/kernel/hostname
[ -n "$old" ] && [ "$old" != "$host" ] && sed -i "s/\(127\.0\.1\.1[[:space:]]\+\)$old\b/\1$host/" /etc/hosts &
echo "$machine_id" >/etc/machine-id
# The login keys, beside the template's own (cloud-init made the file,
# owner and modes right).
home=''
while IFS=: read -r u _ _ _ _ h _; do
  [ "$u" = "$user" ] && { home=$h; break; }
done </etc/passwd
[ -n "$home" ] || home=$(getent passwd "$user" | cut -d: -f6)
ak="$home/.ssh/authorized_keys"
if [ -n "$home" ] && [ -d "$home/.ssh" ] && [ -f "$ak" ] && [ ! -L "$ak" ]; then
  printf '%s' "$keys" >>"$ak"
elif [ -n "$home" ]; then
  mkdir -p "$home/.ssh"
  printf '%s' "$keys" >>"$ak"
  chown -R "$user:" "$home/.ssh"
  chmod 700 "$home/.ssh"
  chmod 600 "$ak"
fi
# Until sshd listens again with this VM's key.
(
  n=0
  [ -n "$sock" ] && n=40
  while [ $n -lt 40 ]; do
    listener
    [ -n "$l" ] && [ "$l" != "$before" ] && break
    sleep 0.05; n=$((n + 1))
  done
  step "sshd serves this VM's host key"
) &
sshd=$!
if [ -n "$same_mac" ]; then
  wait "$clock"
  wait "$sshd"
  echo "<3>nox-warm: identity applied" >/dev/kmsg
  exit 0
fi
# The network: every file a network renderer wrote that names the
# template's MAC names this VM's: networkd's (cloud-init's own, or
# netplan's in /run), netplan's YAML, ifupdown's, NetworkManager's, udev's
# naming rules. One sed for all of them.
list=$(grep -lisF "$old_mac" /etc/systemd/network/* /run/systemd/network/* /etc/netplan/*.yaml \
  /etc/network/interfaces /etc/network/interfaces.d/* \
  /etc/NetworkManager/system-connections/* /run/NetworkManager/system-connections/* \
  /etc/udev/rules.d/*.rules 2>/dev/null)
if [ -n "$list" ]; then
  ifs=$IFS
  IFS='
'
  set -f
  # shellcheck disable=SC2086 # one file a line
  set -- $list
  set +f
  IFS=$ifs
  sed -i "s/$old_mac/$mac/I" "$@"
fi
udevadm control --reload 2>/dev/null &
networkctl reload 2>/dev/null
command -v nmcli >/dev/null && nmcli connection reload 2>/dev/null
wait $!
step "network config names this VM's MAC"
# The NICs come back as new devices; whatever manages the network
# configures them from the rewritten files. Where ifupdown configures one,
# or nothing known does, it is brought up here, after udev named it
# (beside the wait for its address below).
for x in $rebind; do
  echo "${x##*/}" >"${x%/*}/bind" || continue
  case " $managed " in *" ${x##*/} "*) continue ;; esac
  (
    udevadm settle -t 10 2>/dev/null
    for n in /sys/bus/*/devices/"${x##*/}"/net/*; do
      [ -e "$n" ] || continue
      ifc=${n##*/}
      ip link set dev "$ifc" up
      if command -v ifup >/dev/null && grep -qs "^iface $ifc " /etc/network/interfaces /etc/network/interfaces.d/*; then
        ifdown --force "$ifc" 2>/dev/null
        ifup "$ifc"
      fi
      break
    done
  ) &
done
for ifc in $downs; do
  ip link set dev "$ifc" address "$mac"
  ip link set dev "$ifc" up
  networkctl reconfigure "$ifc" 2>/dev/null
  if command -v ifup >/dev/null && grep -qs "^iface $ifc " /etc/network/interfaces /etc/network/interfaces.d/*; then
    ifdown --force "$ifc" 2>/dev/null
    ifup "$ifc"
  fi
done
step "NIC re-probed with this VM's MAC"
# SSH answers once each NIC has an address (DHCP's, at most 20 s here): a
# route through it (the address's prefix route), read from /proc/net/route
# with the shell's own `read`; a re-probed NIC is looked up by its device
# (udev may rename it meanwhile).
routed() {
  while read -r r _; do [ "$r" = "$1" ] && return 0; done </proc/net/route
  return 1
}
names() { # sets $ns (shell functions share the hook's variables)
  ns="$downs"
  for y in $rebind; do
    for p in /sys/bus/*/devices/"${y##*/}"/net/*; do
      [ -e "$p" ] && ns="$ns ${p##*/}"
    done
  done
}
n=0
while [ $n -lt 400 ]; do
  names
  missing=''
  for ifc in $ns; do routed "$ifc" || missing=1; done
  [ -n "$ns" ] && [ -z "$missing" ] && break
  [ -z "$rebind$downs" ] && break
  sleep 0.05; n=$((n + 1))
done
wait "$clock"
wait "$sshd"
echo "<3>nox-warm: identity applied" >/dev/kmsg
