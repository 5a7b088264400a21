"""restok.losses"""
