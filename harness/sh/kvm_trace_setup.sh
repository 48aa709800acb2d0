# shellcheck shell=sh
# Set up a KvmTracer's tracefs group and instance, after sweeping the groups left by
# killed migstall runs.  harness/measure/kvm_trace.py runs kvm_trace_lib.sh + this
# file on the measured host, as root:
#   sh -c SCRIPT sh TRACEFS GROUP BUFFER_KB STALE_S SPEC...
# SPEC is FUNCTION or FUNCTION@FETCHARGS.  Output, one line each (parsed by kvm_trace.py):
#   probed F | failed F | tracepoint E | clock C | swept GROUP AGE_S | error STEP REASON
# Exit status: 0; 3 when the instance cannot be created; 4 when the probe events or
# tracing_on cannot be switched on (kvm_trace._SETUP_NOT_ON).
T=$1; G=$2; KB=$3; STALE=$4; shift 4
I=$T/instances/$G
# sweep groups left by migstall runs that were killed (never younger than STALE)
now=$(date +%s)
case $now in ''|*[!0-9]*) echo "error sweep no host time"; now="";; esac
[ -n "$now" ] && for g in $( { sed -n 's|^[pr][0-9]*:\(migstall_[A-Za-z0-9_]*\)/.*|\1|p' "$T/kprobe_events"
                               for d in "$T"/instances/migstall_*; do [ -d "$d" ] && echo "${d##*/}"; done
                             } | sort -u); do
  [ "$g" = "$G" ] && continue
  case $g in *[!A-Za-z0-9_]*) continue;; esac
  case $g in
    migstall_[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f])  # older versions: no time
      born=$(stat -c %Y "$T/instances/$g" 2>/dev/null || stat -c %Y "$T/events/$g" 2>/dev/null);;
    migstall_*_*) born=${g#migstall_}; born=${born%%_*};;
    *) continue;;
  esac
  case $born in ''|*[!0-9]*) continue;; esac
  age=$((now - born))
  [ "$age" -gt "$STALE" ] || continue
  if msg=$(remove_group "$T" "$g" 2>&1); then echo "swept $g $age"
  else echo "error sweep $g: $(printf '%s' "$msg" | tr '\n' ' ')"; fi
done
for spec in "$@"; do
  f=${spec%%@*}; a=""; [ "$f" != "$spec" ] && a=" ${spec#*@}"
  # with fetch args if given; without them if the kernel refuses those
  if echo "p:$G/${f}__e $f$a" >> "$T/kprobe_events" 2>/dev/null ||
     { [ -n "$a" ] && echo "p:$G/${f}__e $f" >> "$T/kprobe_events" 2>/dev/null; }; then
    if echo "r:$G/${f}__r $f" >> "$T/kprobe_events" 2>/dev/null; then echo "probed $f"
    else echo "-:$G/${f}__e" >> "$T/kprobe_events"; echo "failed $f"; fi
  else echo "failed $f"; fi
done
mkdir "$I" || exit 3
put 0 "$I/tracing_on" tracing_on
if grep -qw mono "$I/trace_clock"; then c=mono; else c=global; fi
put $c "$I/trace_clock" trace_clock
put "$KB" "$I/buffer_size_kb" buffer_size_kb
# without these two there is nothing to measure: exit 4, tracing unavailable
if [ -d "$I/events/$G" ]; then put 1 "$I/events/$G/enable" probe_events || exit 4; fi
for e in "$T"/events/kvm/kvm_migstall_*; do
  [ -d "$e" ] && put 1 "$I/events/kvm/${e##*/}/enable" "tracepoint_${e##*/}" && echo "tracepoint ${e##*/}"
done
put 1 "$I/tracing_on" tracing_on || exit 4
echo "clock $(cat "$I/trace_clock")"
exit 0
