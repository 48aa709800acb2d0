"""``migstall nightly``: stock vs patched on bare-metal hosts (or the virtual host), unattended.

* :mod:`harness.nightly.config`  nightly.toml schema and up-front validation
* :mod:`harness.nightly.boot`    boot methods (kexec, grub-reboot, virtual) as small classes
* :mod:`harness.nightly.kernels` kernel artifacts per variant (prebuilt or built from a manifest)
* :mod:`harness.nightly.plan`    run order (A B A B interleaving) and resume keys
* :mod:`harness.nightly.run`     the loop, failed rows for boots that never come back, the report
"""
