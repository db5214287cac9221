/*
 * nodeagent's pod sandbox process.
 *
 * It holds the pod's namespaces open and otherwise does nothing: sleeps until a
 * signal arrives. When the pod shares one PID namespace this is its PID 1, so
 * orphaned processes are reparented here and must be reaped, or they stay
 * zombies. SIGTERM/SIGINT end it with status 0. As PID 1 of a namespace the
 * kernel drops signals without a handler, hence the explicit handlers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_terminate(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static int install(int sig, void (*handler)(int), int flags) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    return sigaction(sig, &action, NULL);
}

int main(int argc, char **argv) {
    if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
        puts("nodeagent-pause 1");
        return 0;
    }
    if (install(SIGTERM, on_terminate, 0) != 0 || install(SIGINT, on_terminate, 0) != 0 ||
        install(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART) != 0) {
        perror("pause: sigaction");
        return 1;
    }
    /* Children that died before the handler was installed. */
    on_child(SIGCHLD);
    for (;;) {
        pause();
    }
}
