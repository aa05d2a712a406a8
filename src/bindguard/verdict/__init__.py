"""Pure judgement, no I/O: from the kernel's answer and the evidence to conflicts, each with its
kind (conflicts), the action a conflict gets when no policy names one (policy), and what in scan's
host map needs attention (scan). Imports only bindguard.model, so every rule here is tested on
recorded evidence.
"""
