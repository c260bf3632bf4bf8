/* Guest side of the vsock tests (busybox has no AF_VSOCK):
 *   vsock_cat connect CID PORT   stdin -> connection (then half-close), connection -> stdout
 *   vsock_cat echo PORT          accept one connection, send back everything it receives
 */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static char buf[65536];

static int pump(int from, int to) {
    ssize_t n;
    while ((n = read(from, buf, sizeof buf)) > 0) {
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(to, buf + off, n - off);
            if (w <= 0) return -1;
            off += w;
        }
    }
    return n < 0 ? -1 : 0;
}

int main(int argc, char **argv) {
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    if (argc == 4 && !strcmp(argv[1], "connect")) {
        addr.svm_cid = atoi(argv[2]);
        addr.svm_port = atoi(argv[3]);
        if (connect(s, (struct sockaddr *)&addr, sizeof addr)) { perror("connect"); return 1; }
        /* Send and receive at once: an echo peer stops reading once its replies back up. */
        pid_t child = fork();
        if (child == 0) {
            int rc = pump(0, s);
            shutdown(s, SHUT_WR);
            _exit(rc ? 1 : 0);
        }
        int rc = pump(s, 1);
        int status = 0;
        waitpid(child, &status, 0);
        return rc || !WIFEXITED(status) || WEXITSTATUS(status) ? 1 : 0;
    }
    if (argc == 3 && !strcmp(argv[1], "echo")) {
        addr.svm_cid = VMADDR_CID_ANY;
        addr.svm_port = atoi(argv[2]);
        if (bind(s, (struct sockaddr *)&addr, sizeof addr) || listen(s, 1)) { perror("listen"); return 1; }
        printf("listening\n");
        fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        int rc = pump(c, c);
        close(c);
        return rc ? 1 : 0;
    }
    fprintf(stderr, "usage: vsock_cat connect CID PORT | echo PORT\n");
    return 2;
}
