"""restok.stages: one module per stage, each run as `python -m restok.stages.<stage>`.

Importing this package (which that command does before the stage's module) keeps the process to the CPUs its job
requested (restok.cpus), so no stage's main has to remember it.
"""

from restok.cpus import limit_threads

limit_threads()
