# main.py Start the OTA agent (firmware/app.py). A config error prints and leaves the REPL.
from firmware import app

app.main()
