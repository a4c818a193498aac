from .DareTiesFewShot import DareTiesFewShot as DareTiesFewShot
