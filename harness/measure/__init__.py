"""Turning raw material (QMP events, QEMU trace lines, probe stalls, kernel
tracefs events) into result columns."""
