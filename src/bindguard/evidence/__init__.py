"""What the kernel and /proc say now: the trial bind (probe), the sockets on a port (sockets,
sock_diag), the processes that hold them and their cgroups (owners; holders_of is the one routine
check, scan and verify name a socket's holders with), scan's host map with every question it asks
the manager (hostmap), and what proves a daemon is denied a privileged port (privilege). Imports
only bindguard.model, bindguard.systemd and bindguard.request.
"""
