"""restok.stages"""
