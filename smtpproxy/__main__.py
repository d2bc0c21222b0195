from smtpproxy.cli.main import main

main()
