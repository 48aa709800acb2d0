"""Where QEMU runs.  One scenario runner drives any :class:`~harness.hosts.base.Host`.

* ``local``                  :class:`harness.hosts.local.LocalHost`
* ``ssh://user@host[:port]`` :class:`harness.hosts.ssh.SSHHost`
* ``virtual[:KERNEL]``       :class:`harness.hosts.virtual.VirtualHost` (an L1 VM
                             under TCG with nested KVM, then used as an SSHHost)
* ``vhost``                  the L1 VM left running by ``migstall vhost up``
"""
