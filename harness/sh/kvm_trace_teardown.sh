# shellcheck shell=sh
# Tear down a KvmTracer's tracefs group (harness/measure/kvm_trace.py runs
# kvm_trace_lib.sh + this file as `sh -c SCRIPT sh TRACEFS GROUP` on the host).
remove_group "$1" "$2"
