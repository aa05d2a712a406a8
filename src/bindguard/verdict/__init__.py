"""Pure judgement, no I/O: from the kernel's answer and the evidence to conflicts, each with its
kind (conflicts), and the action a conflict gets when no policy names one (policy). Imports only
bindguard.model, so every rule here is tested on recorded evidence.
"""
