# boot.py Runs first on every boot. Kept tiny: nothing here can fail, so a broken main.py
# still leaves the board reachable over the REPL (mpremote).
import gc

gc.collect()
