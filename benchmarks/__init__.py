"""flashsae's benchmark suite: SAE training steps against the hardware floor, plain torch and peers."""
