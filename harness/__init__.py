"""migstall: measure what happens to vCPUs when QEMU/KVM live migration starts.

Package layout (see README "Code map"):
  harness.qemu        QEMU machines, QMP, migration
  harness.guest       guest kernel, initramfs and the in-guest probe channel
  harness.kernel      kernel builds from a series manifest
  harness.hosts       where QEMU runs: local, ssh, virtual (nested KVM)
  harness.measure     turning events, traces and probe data into columns
  harness.results     the CSV schema and atomic writers
  harness.compare     stock vs patched statistics and reports
  harness.sh          the shell scripts run on hosts or put into images (*.sh, package data)
"""

__version__ = "0.1.0"
