"""The guest: kernel, initramfs with busybox and the probe, and the probe channel."""
