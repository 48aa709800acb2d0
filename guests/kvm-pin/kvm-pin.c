/*
 * migstall-kvm-pin: hold one idle KVM VM open for the life of the virtual host.
 *
 * Why: creating the first KVM VM, and destroying the last one, flips kernel
 * static keys (preempt_notifier_key, patched into __schedule, and KVM's
 * apic_sw_disabled).  The kernel patches the code live with text_poke_bp(): an
 * int3 first, then the new bytes.  Under QEMU 7.2's multi-threaded TCG the
 * other L1 vCPU can keep a stale translation of the transient int3.  The int3
 * handler then finds no int3 in memory and resumes at the same address, so
 * that vCPU traps there forever with interrupts off, and L1 is dead.  We saw
 * L1 stuck at __schedule+0x2ab, the preempt_notifier_key site, with a nop in
 * memory, after an L2 QEMU exited.  With one VM (irqchip + one vCPU that never
 * runs) held from boot, the counts never return to 0, so L2 launches and exits
 * patch nothing.
 *
 * Runs from L1's init: the parent returns 0 once the VM exists, and the child
 * keeps the descriptors open, sleeping.  Constants are from <linux/kvm.h>.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define KVM_CREATE_VM      0xAE01UL
#define KVM_CREATE_IRQCHIP 0xAE60UL
#define KVM_CREATE_VCPU    0xAE41UL

static int pin(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        fprintf(stderr, "migstall-kvm-pin: open /dev/kvm: %s\n", strerror(errno));
        return 1;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) {
        fprintf(stderr, "migstall-kvm-pin: KVM_CREATE_VM: %s\n", strerror(errno));
        return 1;
    }
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) {
        fprintf(stderr, "migstall-kvm-pin: KVM_CREATE_IRQCHIP: %s\n", strerror(errno));
        return 1;
    }
    if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0) {
        fprintf(stderr, "migstall-kvm-pin: KVM_CREATE_VCPU: %s\n", strerror(errno));
        return 1;
    }
    return 0;
}

int main(void)
{
    int fds[2];
    char status = 1;

    if (pipe(fds) < 0) {
        perror("migstall-kvm-pin: pipe");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("migstall-kvm-pin: fork");
        return 1;
    }
    if (child == 0) {
        close(fds[0]);
        setsid();
        status = (char)pin();
        if (write(fds[1], &status, 1) != 1 || status != 0)
            return 1;
        close(fds[1]);
        for (;;)
            pause();
    }
    close(fds[1]);
    if (read(fds[0], &status, 1) != 1)
        status = 1;
    if (status != 0)
        waitpid(child, NULL, 0);
    else
        printf("migstall-kvm-pin: holding an idle VM (pid %d)\n", (int)child);
    return status;
}
