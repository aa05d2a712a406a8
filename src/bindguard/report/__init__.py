"""What a person or a program reads: the console (output: journal priorities on stderr, every
untrusted character escaped), the guard's outcome as text and JSON (outcome), the scan as a
table, journal lines, JSON and a metrics file (scan), and every command's --json object on stdout
(jsonout). Imports every stage below it, never bindguard.cli.
"""
