"""restok.convert"""
