"""What the series does there: probes, doctor, real builds, the pairing table."""
