/* migstall-nothp: exec argv[1..] with transparent huge pages disabled. */
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>
#ifndef PR_SET_THP_DISABLE
#define PR_SET_THP_DISABLE 41
#endif
int main(int argc, char **argv)
{
    if (argc < 2) { fprintf(stderr, "usage: migstall-nothp PROG [ARGS...]\n"); return 2; }
    if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)) { perror("prctl(PR_SET_THP_DISABLE)"); return 1; }
    execvp(argv[1], argv + 1);
    perror(argv[1]);
    return 127;
}
