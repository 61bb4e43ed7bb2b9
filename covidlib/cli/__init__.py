"""The absl binaries: covidlib-train, covidlib-evaluate, covidlib-predict (and covidlib-export).

Each module holds flags and a thin `main(argv)` over library functions; `common.run_main` turns
covidlib's typed errors into one line on stderr and an exit status.
"""
