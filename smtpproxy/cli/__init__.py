"""The `smtpproxy` command line (Typer): parse, call, print.

Each module is one command or command group. A command imports its back end inside
the function (so `smtpproxy --help` stays fast), calls the admin, ops or runtime
package, and prints; it runs no SQL of its own. Errors become one line on stderr and a
non-zero exit, never a traceback.
"""
