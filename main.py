# main.py Start the OTA agent (firmware/agent.py). A config error prints and leaves the REPL.
from firmware import agent

agent.main()
