"""Distribution: `gateway` is the one module that talks to Horovod (ranks, collectives, the distributed optimizer,
clip-and-step with the collective skip/stop vote), `elastic` its elastic mode, `launcher` the
`glow-dist-horovodrun` wrapper that lets stop signals reach the ranks, and `srun` the `glow-dist-srun` launch under
Slurm without ssh (srun starts the ranks; Horovod's Gloo rendezvous in the batch step). Everything else calls
`gateway` and never imports horovod; the model package never imports this one.
"""
