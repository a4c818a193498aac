from .SimpleLlamaMerge import SimpleLlamaMerge as SimpleLlamaMerge
