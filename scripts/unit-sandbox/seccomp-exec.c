// Runs a program under a seccomp allow-list read from a file (one syscall name per line);
// anything else fails with EPERM, like systemd's SystemCallFilter= with
// SystemCallErrorNumber=EPERM.
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
typedef void* scmp_filter_ctx;
scmp_filter_ctx seccomp_init(uint32_t def_action);
int seccomp_rule_add(scmp_filter_ctx ctx, uint32_t action, int syscall, unsigned int arg_cnt, ...);
int seccomp_load(scmp_filter_ctx ctx);
int seccomp_syscall_resolve_name(const char* name);
#define SCMP_ACT_ALLOW 0x7fff0000U
#define SCMP_ACT_ERRNO(x) (0x00050000U | ((x)&0x0000ffffU))
int main(int argc, char** argv) {
  if (argc < 3) return 2;
  FILE* f = fopen(argv[1], "r");
  if (!f) {
    perror("allow list");
    return 2;
  }
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ERRNO(EPERM));
  char name[128];
  int n = 0;
  while (fscanf(f, "%127s", name) == 1) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr < 0) continue;  // not on this architecture
    if (seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) == 0) ++n;
  }
  // execve itself must pass (it is in @system-service anyway).
  prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  if (seccomp_load(ctx) != 0) {
    fprintf(stderr, "seccomp_load failed\n");
    return 2;
  }
  execv(argv[2], argv + 2);
  perror("execv");
  return 127;
}
