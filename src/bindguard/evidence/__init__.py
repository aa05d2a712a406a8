"""What the kernel and /proc say now: the trial bind (probe), the sockets on a port (sockets,
sock_diag), the processes that hold them and their cgroups (owners), and what proves a daemon is
denied a privileged port (privilege). Imports only bindguard.model, bindguard.systemd and
bindguard.request.
"""
