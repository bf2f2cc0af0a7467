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
# Where this VM's MAC differs from the template's (a bridge: MACs must be
# unique there), the NIC is unbound from the start until it is this VM's
# own, so nothing reaches the guest half-made, and its chain (the probe,
# udev, networkd, DHCP) starts first; on user networking the VM keeps the
# template's MAC (its only peer is its own passt) and its NIC. sshd gets
# this VM's host key next (it re-executes on SIGHUP); the clock and the
# login keys beside it. The
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
# The files a network renderer wrote that name one of the MACs $@ (one a
# line): networkd's (cloud-init's own, or netplan's in /run), netplan's
# YAML, ifupdown's, NetworkManager's, udev's naming rules and links.
named() {
  n=$#
  for m; do set -- "$@" -e "$m"; done
  shift "$n"
  grep -lisF "$@" /etc/systemd/network/* /run/systemd/network/* /etc/netplan/*.yaml \
    /etc/network/interfaces /etc/network/interfaces.d/* \
    /etc/NetworkManager/system-connections/* /run/NetworkManager/system-connections/* \
    /etc/udev/rules.d/*.rules 2>/dev/null
}
# Found now, in the template's source (a resumed VM would spend ~0.1 s on
# it): the saved guest's files are these.
macs=''
for i in /sys/class/net/*; do
  read -r a 2>/dev/null <"$i/address" || continue
  [ "$a" = 00:00:00:00:00:00 ] || macs="$macs $a"
done
# shellcheck disable=SC2086 # MACs: no blanks, no patterns
list=$([ -n "$macs" ] && named $macs)
# Reads $1 sectors of the block; sets $first, its first line. The poll
# reads the first sector only, which holds nothing secret: the source's
# own seed may be a warm VM's, and this file is in the RAM the template
# saves.
readblk() {
  dd if="$dev" of="$blk" bs=512 skip=@SKIP@ count="$1" iflag=direct 2>/dev/null
  first=''
  read -r first 2>/dev/null <"$blk" || :
}
# A new MAC (a bridge): `leave` takes the NICs that still have the
# template's MAC ($old_mac) off the network at once. Their driver is
# unbound (nothing reaches the guest before the NIC is this VM's; the
# kernel's unregistering takes ~0.1-0.2 s, spent beside the steps below),
# and bound again below once the network config names this VM's MAC.
# Binding resets the device, so qemu gives it this VM's MAC (its -device
# argument) and the kernel reads that as the permanent address too:
# netplan and NetworkManager match the permanent address, and a resumed
# device keeps the template's. Paths resolved with `cd -P`: no process.
rebind='' downs='' managed='' left=''
leave() {
  left=1
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
      [ -w unbind ]; then
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
  if [ -n "$rebind" ]; then
    (for x in $rebind; do echo "${x##*/}" >"${x%/*}/unbind"; done) &
    unbound=$!
  fi
}
# networkd reloads on SIGHUP where its unit says Type=notify-reload
# (systemd 253 and later; an older one would die of it): then a resumed VM
# needs no networkctl for it.
nd_hup=''
while IFS= read -r l; do
  [ "$l" = Type=notify-reload ] && nd_hup=1
done 2>/dev/null </usr/lib/systemd/system/systemd-networkd.service
# For the wait for an address below, made here (a process fewer there).
fifo=/run/nox-warm.fifo
rm -f "$fifo"
mkfifo -m 600 "$fifo" 2>/dev/null || fifo=''
readblk 1
mine=$first
# A resumed VM's first look sees its own seed: the interval only costs the
# template's source the seconds between this start and the save, and a
# resumed VM half of it.
while [ "$first" = "$mine" ]; do
  sleep 0.02
  readblk 1
done
step "seed changed"
# The public first sector names both MACs.
# first-sector: begin (a unit test runs this part on a seed nox wrote)
mac='' old_mac=''
case "$first" in
"nox-warm 3 "*)
  while IFS= read -r line; do
    case "$line" in
    MAC=*) mac=${line#*=} ;;
    OLD_MAC=*) old_mac=${line#*=} ;;
    PAD=*) break ;;
    esac
  done <"$blk"
  [ -n "$mac" ] && [ -n "$old_mac" ] && [ "$mac" != "$old_mac" ] && leave
  ;;
esac
# first-sector: end
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
# The NIC leaves as soon as this VM's MAC is known (above, from the first
# sector; else here, from the seed's file).
[ -z "$left" ] && [ "$mac" != "$old_mac" ] && leave
same_mac=''
[ "$mac" = "$old_mac" ] && same_mac=1
# The CRNG: with qemu's vmgenid (amd64) the kernel reseeded before
# anything in the guest ran ("crng reseeded due to virtual machine fork");
# the seed's entropy is mixed in beside what follows. Without (arm64), VMs
# resumed from one state would share its CRNG until its next scheduled
# reseed: the seed's entropy is credited and the CRNG reseeded at once
# (RNDADDENTROPY, RNDRESEEDCRNG, made by perl, Essential in Debian),
# before anything reaches the network or sshd.
vmgenid=''
for v in /sys/bus/acpi/drivers/vmgenid/*:* /sys/bus/platform/drivers/vmgenid/*:*; do
  [ -e "$v" ] && vmgenid=1
done
if [ -n "$vmgenid" ]; then
  step "crng reseeded by vmgenid"
else
  printf '%s' "$entropy" | base64 -d | perl -e 'binmode STDIN; local $/; my $d = <STDIN>;
    open(my $f, "+<", "/dev/urandom") or die "$!";
    ioctl($f, 0x40085203, pack("ii", 8 * length($d), length($d)) . $d) or die "RNDADDENTROPY: $!";
    ioctl($f, 0x5207, 0) or die "RNDRESEEDCRNG: $!";' && step "crng reseeded"
fi
umask 022
# hosts-rename: begin (a unit test runs this part)
# In the hosts file $1, each name on its 127.0.1.1 line that was the
# template's hostname ($old) becomes this VM's ($host): cloud-init writes
# it twice there, as the FQDN and the name.
rename_hosts() {
  sed -i "/^127\.0\.1\.1[[:space:]]/{:a
s/\([[:space:]]\)$old\([[:space:]]\|\$\)/\1$host\2/
ta
}" "$1"
}
# hosts-rename: end
# The names, before any DHCP request carries the hostname.
read -r old </proc/sys/kernel/hostname || old=''
echo "$host" >/etc/hostname
echo "$host" >/proc/sys/kernel/hostname
echo "$machine_id" >/etc/machine-id
if [ -z "$same_mac" ]; then
  # The network first (a bridge): its chain (the NIC's probe, udev,
  # networkd, DHCP) is the longest, and mostly waits on other processes.
  # Every file that names the template's MAC names this VM's, one sed for
  # all of them.
  case " $macs " in *" $old_mac "*) ;; *) list=$(named "$old_mac") ;; esac
  udev=''
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
    for f; do case "$f" in /etc/udev/* | *.link) udev=1 ;; esac; done
  fi
  # udev names the NIC when it comes back: its rules first. networkd
  # reloads beside the bind (~0.1 s each): a NIC it sees before its reload
  # is unmanaged until the reload, which then configures it.
  [ -n "$udev" ] && udevadm control --reload 2>/dev/null
  command -v nmcli >/dev/null && nmcli connection reload 2>/dev/null
  p='' c='' reload=''
  if [ -n "$nd_hup" ]; then
    read -r p 2>/dev/null </sys/fs/cgroup/system.slice/systemd-networkd.service/cgroup.procs
    [ -n "$p" ] && read -r c 2>/dev/null </proc/"$p"/comm
  fi
  if [ "$c" = systemd-network ] && kill -HUP "$p" 2>/dev/null; then
    :
  else
    networkctl reload 2>/dev/null &
    reload=$!
  fi
  step "network config names this VM's MAC"
  if [ -n "$rebind" ]; then
    # A NIC whose unbind failed is still bound: it is brought down and
    # changed in place below instead.
    wait "$unbound"
    kept=''
    for x in $rebind; do
      if [ -e "$x" ]; then
        for p in "$x"/net/*; do
          [ -e "$p" ] || continue
          ip link set dev "${p##*/}" down
          downs="$downs ${p##*/}"
        done
      else
        kept="$kept $x"
      fi
    done
    rebind=$kept
  fi
  # The NICs come back as new devices; whatever manages the network
  # configures them from the rewritten files. Where ifupdown configures
  # one, or nothing known does, it is brought up here, after udev named it
  # (beside the rest).
  for x in $rebind; do
    echo "${x##*/}" >"${x%/*}/bind" || continue
    case " $managed " in *" ${x##*/} "*) continue ;; esac
    (
      udevadm settle -t 10 2>/dev/null
      for n in "$x"/net/*; do
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
  # (A signalled reload is not awaited: reconfigure after a sure one.)
  if [ -n "$downs" ]; then
    if [ -n "$reload" ]; then wait "$reload"; else networkctl reload 2>/dev/null; fi
  fi
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
fi
# The SSH host key: sshd re-executes on SIGHUP (a new listening socket)
# and runs beside the rest. The commit left only the throwaway ed25519
# key, overwritten here.
for f in /etc/ssh/ssh_host_*; do
  case "$f" in
  */ssh_host_ed25519_key | */ssh_host_ed25519_key.pub) ;;
  *) [ -e "$f" ] && rm -f "$f" ;;
  esac
done
umask 077
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
# kernel's clock does not), the seed's entropy, /etc/hosts.
(
  if read -r now 2>/dev/null </sys/class/rtc/rtc0/since_epoch; then
    date -s "@$now" >/dev/null
  fi
  # Mixed in, not credited (vmgenid reseeded): its base64 text will do.
  [ -n "$vmgenid" ] && printf '%s' "$entropy" >/dev/urandom
) &
clock=$!
[ -n "$old" ] && [ "$old" != "$host" ] && rename_hosts /etc/hosts &
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
    sleep 0.05
    n=$((n + 1))
  done
  step "sshd serves this VM's host key"
) &
sshd=$!
# SSH answers once each NIC has an address (DHCP's, at most 20 s here): a
# route through it (the address's prefix route), read from /proc/net/route
# with the shell's own `read`; a re-probed NIC is looked up by its device
# (udev may rename it meanwhile). Checked again on each IPv4 address
# event (`ip monitor`, through the fifo), and every 0.2 s in case one came
# before the monitor listened.
routed() {
  while read -r r _; do [ "$r" = "$1" ] && return 0; done </proc/net/route
  return 1
}
addressed() {
  ns="$downs"
  for y in $rebind; do
    for p in "$y"/net/*; do [ -e "$p" ] && ns="$ns ${p##*/}"; done
  done
  [ -n "$ns" ] || return 1
  for ifc in $ns; do routed "$ifc" || return 1; done
}
if [ -n "$rebind$downs" ] && ! addressed; then
  if [ -n "$fifo" ]; then
    ip -o -4 monitor address >"$fifo" 2>/dev/null &
    mon=$!
    (
      n=0
      while [ $n -lt 100 ]; do
        sleep 0.2
        echo
        n=$((n + 1))
      done
    ) >"$fifo" &
    tick=$!
    exec 3<"$fifo"
    while ! addressed; do read -r _ <&3 || break; done
    kill "$mon" "$tick" 2>/dev/null
    exec 3<&-
  else
    n=0
    while [ $n -lt 400 ] && ! addressed; do
      sleep 0.05
      n=$((n + 1))
    done
  fi
fi
rm -f "$fifo"
wait "$clock"
wait "$sshd"
echo "<3>nox-warm: identity applied" >/dev/kmsg
