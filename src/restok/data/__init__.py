"""restok.data"""
