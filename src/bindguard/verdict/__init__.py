"""Pure judgement, no I/O: from the kernel's answer and the evidence to conflicts, each with its
kind (conflicts), the action each conflict gets, decided once (policy), what in scan's
host map needs attention (scan), whether verify's unit serves its addresses (verify), and the fix
texts (remedies). Imports only bindguard.model, so every rule here is tested on recorded evidence.
"""
