"""restok.train"""
