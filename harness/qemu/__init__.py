"""QEMU machines, QMP and migration."""
