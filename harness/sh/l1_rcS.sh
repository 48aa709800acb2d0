#!/bin/sh
# migstall L1 init (busybox init runs this as sysinit; busybox ash).
# harness/hosts/l1image.py puts this file into L1's initramfs as /etc/init.d/rcS,
# its KEEPER placeholder line replaced by kvm_trace.keeper_init_script() (l1_keeper.sh).
# Each line MIGSTALL-L1-* on /dev/ttyS1 is read by the host (l1image.READY_LINE & co).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
fail() { echo "MIGSTALL-L1-FAILED $*" > /dev/ttyS1; echo "migstall-l1: FAILED: $*" > /dev/console; exit 1; }
stage() { echo "MIGSTALL-L1-STAGE $* $(cut -d' ' -f1 /proc/uptime)" > /dev/ttyS1; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
stage init
mkdir -p /dev/pts /dev/shm /run/sshd /tmp /var/log /root /dev/hugepages
chmod 0755 /run/sshd; chmod 1777 /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t hugetlbfs hugetlbfs /dev/hugepages 2>/dev/null
stage modules
if [ -f /etc/migstall/modules ]; then
  while read -r mod path; do
    params=""
    # splitting wanted: /proc/cmdline is one line of space-separated parameters
    # shellcheck disable=SC2013
    for arg in $(cat /proc/cmdline); do
      case "$arg" in "$mod".*=*) params="$params ${arg#"$mod".}";; esac
    done
    # one argument per parameter
    # shellcheck disable=SC2086
    insmod "$path" $params || fail "insmod $mod$params failed"
  done < /etc/migstall/modules
fi
[ -c /dev/kvm ] || fail "no /dev/kvm (is the CPU model exposing svm/vmx?)"
stage tracing
@KEEPER@
# Live code patching can hang L1 under multi-threaded TCG (a stale translation of
# text_poke_bp's transient int3 traps forever; see guests/kvm-pin/kvm-pin.c).
# Hold one idle VM so L2 launches and exits never flip KVM's static keys, and
# keep kprobes as plain int3s: no optimizer rewriting them into jumps later.
stage kvm-pin
/usr/sbin/migstall-kvm-pin > /dev/console 2>&1 || fail "migstall-kvm-pin could not create the idle KVM VM"
echo 0 > /proc/sys/debug/kprobes-optimization 2>/dev/null
stage network
hostname migstall-l1
ip link set lo up
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
stage sshd
/usr/sbin/sshd -f /etc/ssh/sshd_config -E /var/log/sshd.log || fail "sshd did not start: $(cat /var/log/sshd.log)"
# sshd writes its PidFile once its listening socket is bound
i=0
while [ ! -s /run/sshd.pid ]; do
  i=$((i+1)); [ "$i" -gt 400 ] && fail "sshd wrote no pidfile: $(cat /var/log/sshd.log)"; sleep 0.05
done
echo "MIGSTALL-L1-READY $(uname -r)" > /dev/ttyS1
