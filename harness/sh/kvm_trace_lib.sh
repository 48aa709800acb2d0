# shellcheck shell=sh
# Shell functions of the tracefs setup and teardown scripts (harness/measure/kvm_trace.py
# prepends this file to kvm_trace_setup.sh and kvm_trace_teardown.sh and runs the
# result with `sh -c SCRIPT sh ARGS...` on the measured host, as root).
#
# remove_group T G: switch the instance T/instances/G off and remove it, then
#   delete every probe of event group G (appending -:G/EVENT, so other users'
#   probes survive); complaints on stderr, status 1 when something is left.
# put VALUE FILE STEP: write VALUE to FILE; on failure print
#   "error STEP REASON" on stdout and return 1.

remove_group() {
  [ -n "$2" ] || return 1
  _I=$1/instances/$2; _rc=0
  if [ -d "$_I" ]; then
    echo 0 > "$_I/tracing_on"
    [ -d "$_I/events/$2" ] && echo 0 > "$_I/events/$2/enable"
    for _e in "$_I"/events/kvm/kvm_migstall_*; do [ -d "$_e" ] && echo 0 > "$_e/enable"; done
    rmdir "$_I" || { echo "cannot remove $_I" >&2; _rc=1; }
  fi
  _evs=$(sed -n "s|^[pr][0-9]*:\($2/[^ ]*\).*|\1|p" "$1/kprobe_events") || _rc=1
  for _ev in $_evs; do
    echo "-:$_ev" >> "$1/kprobe_events" || { echo "cannot remove probe $_ev" >&2; _rc=1; }
  done
  return $_rc
}
put() {
  # not a useless echo: the write error (echo's stderr) is what is captured
  # shellcheck disable=SC2116
  _err=$(echo "$1" 2>&1 > "$2") && return 0
  echo "error $3 $(printf '%s' "${_err:-write failed}" | tr '\n' ' ')"
  return 1
}
