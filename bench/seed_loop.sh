#!/bin/bash
# A faithful re-implementation of the seed's loop (../shared/seed.txt), for the benchmark only.
# Same structure and the same edge cases: it sources the stats file, finds the server with
# `ps ax | grep NAME`, fetches and pulls with git, rebuilds with make, and sleeps.
# Run it from the clone it deploys (its working directory), as the seed does.
#
# The seed hard-codes its settings; here they come from the environment, never from arguments,
# so that `ps ax | grep NAME` cannot match this script's own command line:
#   SEED_PROC         the program name grep looks for (the benchmark makes it unique per run)
#   SEED_STATS        the stats file the server writes and this loop sources
#   SEED_SOURCE       the directory rebuilt with `make clean && make install` (default .)
#   SEED_LONG_SLEEP   the seed's `sleep 300` between checks (default 300)
#   SEED_SHORT_SLEEP  the seed's two `sleep 30`: drain re-check and quick re-check (default 30)
# The one addition is the log line "Changes found": the benchmark needs to see the moment a new
# commit is noticed, which the seed does not log. It changes nothing else.

# Variables
PROC="${SEED_PROC:?SEED_PROC is required}"
STATS="${SEED_STATS:?SEED_STATS is required}"
SOURCE_CODE="${SEED_SOURCE:-.}"
LONG_SLEEP="${SEED_LONG_SLEEP:-300}"
SHORT_SLEEP="${SEED_SHORT_SLEEP:-30}"
n_clients="0"

# log()
#
# Log to standard error a script related point of interest.
#
# @param $@ The message to be printed.
function log {
  echo "[$(date +%F_%H-%M-%S)] $@" >/dev/stderr
}

# read_config()
#
# Read the configuration file, otherwise set default values.
function read_config {
  log "[before] n_clients = $n_clients"
  if [ -f "$STATS" ]; then
    . $STATS
  fi
  log "[after] n_clients = $n_clients"
}

# restart_process()
#
# Stop any existing process by the same name and then start a new one.
function restart_process {
  # Ensure we create a new stats file
  rm $STATS
  # If process is running
  res="$(ps ax | grep $PROC | grep -v grep)"
  if [ ! "${res:-null}" = null ]; then
    pid="$(echo $res | awk '{print $1}')"
    log "Trying to kill process $pid"
    kill $pid
  fi
  log "Trying to start process $PROC"
  bash server.sh &
}

# rebuild_program
#
# Rebuild the program.
function rebuild_program {
  root="$(pwd)"
  cd "$SOURCE_CODE"
  make clean && make install
  cd "$root"
}

# ensure_safe()
#
# Make sure the program is not in active use.
function ensure_safe {
  read_config
  while [ ! $n_clients -eq "0" ]; do
    log "Waiting to rebuild and reboot server, n_clients = $n_clients"
    sleep "$SHORT_SLEEP"
    read_config
  done
}

# Restart process by default
restart_process

# Infinite loop
while :
do
  # Fetch the latest changes
  git fetch
  # Check whether pull required
  if [ $(git rev-parse HEAD) != $(git rev-parse @{u}) ]; then
    log "Changes found"
    # Pull the latest changes
    git pull
    # Rebuild the files
    ensure_safe
    rebuild_program
    # Restart the process
    restart_process
  else
    log "No changes"
  fi
  # Check if process is running
  res="$(ps ax | grep $PROC | grep -v grep)"
  if [ "${res:-null}" = null ]; then
    # As it's not running, rebuild and restart it
    make && restart_process
    # Do another loop shortly
    log "Failed build detected, quick reboot"
    sleep "$SHORT_SLEEP"
  else
    # Sleep for 5 minutes and check again
    log "Nothing to do, sleeping"
    sleep "$LONG_SLEEP"
  fi
done
