# shellcheck shell=sh
# Arm the kprobes of every KvmTracer run once, at L1's boot, in the migstall_keep
# group, and keep them armed for L1's life (why: kvm_trace.keeper_init_script).
# Not run as it is: kvm_trace.keeper_init_script() fills in the @...@ words (each
# replaced by shlex.quote(value), or by quoted words for a list) and
# harness/hosts/l1image.py puts the result into L1's rcS (l1_rcS.sh), at its KEEPER line.
# The values are baked in because this runs on another machine, from an initramfs.
T=@TRACEFS@; G=@GROUP@
if [ -w "$T/kprobe_events" ]; then
  # available_filter_functions is read once: generating its ~50k lines takes
  # over a second under TCG, and a grep per function made this stage 13-15 s
  have=" $(grep -oE @NAMES_ERE@ "$T/available_filter_functions" | tr -d ' ' | tr '\n' ' ')"
  # the SPECS placeholder becomes one word per function (the template has one)
  # shellcheck disable=SC2043
  for spec in @SPECS@; do
    f=${spec%%@*}; a=""; [ "$f" != "$spec" ] && a=" ${spec#*@}"
    case "$have" in *" $f "*) ;; *) continue ;; esac
    { echo "p:$G/${f}__e $f$a" >> "$T/kprobe_events" 2>/dev/null || echo "p:$G/${f}__e $f" >> "$T/kprobe_events"; } &&
      echo "r:$G/${f}__r $f" >> "$T/kprobe_events"
  done
  if [ -d "$T/events/$G" ] && mkdir "$T/instances/$G"; then
    echo 0 > "$T/instances/$G/tracing_on"; echo @BUFFER_KB@ > "$T/instances/$G/buffer_size_kb"
    echo 1 > "$T/instances/$G/events/$G/enable"
    for e in "$T"/events/kvm/kvm_migstall_*; do [ -d "$e" ] && echo 1 > "$T/instances/$G/events/kvm/${e##*/}/enable"; done
  fi
fi
