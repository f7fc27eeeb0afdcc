"""Distribution: `gateway` is the one module that talks to Horovod (ranks, collectives, the distributed optimizer,
clip-and-step with the collective skip/stop vote), `elastic` its elastic mode, and `launcher` the
`glow-dist-horovodrun` wrapper that lets stop signals reach the ranks. Everything else calls `gateway` and never
imports horovod; the model package never imports this one.
"""
