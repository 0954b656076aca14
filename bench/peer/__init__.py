"""P5's peer simulator: its venv, the shared workload file and the runner inside that venv."""
